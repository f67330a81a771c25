"""The foundations: what every other part of captioner uses and that imports nothing of captioner's but itself.

`errors` (the one exception for faults a user can fix), `files` (atomic writes, validated reads), `parts` (class
paths, specs, trusted imports), `pixels` (accepted image formats, decoding without torch), `hardware` (CPU and GPU
facts, precision) and `hub` (where the Hugging Face hub keeps downloads). Importing this package imports none of
them: `captioner.inference.exported` uses some without torch.
"""
