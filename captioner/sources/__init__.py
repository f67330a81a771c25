"""Where images and captions are read from, below both the data and the features that use them: caption records
and their report (`records`), folders of images (`images`), WebDataset shards (`shards`), and the parts a job over
images works through (`parts`)."""
