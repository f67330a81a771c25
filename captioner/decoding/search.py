"""Greedy decoding, sampling and beam search, written once over a step function and `captioner.decoding.ops`.

The PyTorch captioner steps a `CaptionDecoder` (`captioner.models.stepping`);
the torch-free runtime steps ONNX graphs (`captioner.inference.exported`). Both call
`decode` here, so they follow one algorithm and one set of rules:

- every image, beam and sample of a batch advances in one step call; the
  images' constants are prepared once and only the per-caption state is
  reordered;
- beam search keeps `num_beams` live hypotheses per image beside a pool of the
  best finished ones (Hugging Face's design): a caption that ends leaves its
  slot to the next best live candidate instead of narrowing the search. The
  pool is ranked by `length_normalised` scores; an image is done when its pool
  is full and no live hypothesis can beat the pool's worst (`early_stopping`
  says how that is judged). Hypotheses still live at `max_length` join the
  pool as they are, without `<end>`;
- diverse beam search splits the beams into groups, each with its own pool;
  each group's choice at a step is penalised for the words earlier groups
  chose at that step, and the groups' captions are ranked together at the end;
- greedy decoding takes the best word, sampling draws it (after temperature,
  top-k and nucleus rules); both stop a caption at `<end>`. Each image draws
  from a random stream of its own, seeded by the seed and the image's *place*
  (its position in the caller's list, or a stable id): a seeded caption does
  not depend on its batch-mates, and both backends draw the same numbers
  (`RowStreams`, NumPy's PCG64 on the host) into the same inverse-CDF draw.

A caption's score is its total log-probability under the model with the rules
applied (`<end>` included); `lengths` count its words and `<end>`.
"""

from __future__ import annotations

from typing import Any, Protocol

from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.constrained import constrained_beam_search as _constrained_beam_search
from captioner.decoding.decoded import Decoded, length_normalised
from captioner.decoding.rules import NEVER, apply, forced_phrases, rules_for, sampling_rules

Array = Any
State = Any
# Reading a value back makes the host wait for the device: on a GPU, whether every caption has ended is checked
# every few steps (the steps taken after that only add padding, trimmed at the end).
CHECK_EVERY_ON_A_DEVICE = 4


class Stepper(Protocol):
    """What search needs of a model: start a batch of images, step every row, keep chosen rows."""

    def start(self, copies: int) -> State:
        """Prepare the images' constants once and return the state before the first word, `copies` rows per image
        (image-major: image 0's rows first)."""

    def step(self, tokens: Array, state: State) -> tuple[Array, State]:
        """`(rows,)` previous tokens -> `(rows, vocab)` scores of the next token (logits), and the new state."""

    def reorder(self, state: State, rows: Array) -> State:
        """Keep the state rows at `rows` (the surviving beams)."""


class RowStreams:
    """One random stream per image, for sampling: seeded by `(seed, place)`, so an image draws the same numbers
    whatever its batch-mates, and the PyTorch and NumPy backends draw the same ones (generated here, on the host).

    Counter-based (SplitMix64 of the image's key and the draw's index), computed for all images at once: a
    generator object per image cost 12 ms of host time for a batch of 1,024, more than a GPU's search of it.

    Args:
        seed: The decoding seed (None: fresh entropy, different every call).
        places: Each image's place (its position among those the caller captions, or a stable id).
    """

    def __init__(self, seed: int | None, places: list[int]) -> None:
        import numpy as np  # the search itself imports no array library: NumPy is the runtime's, always there

        entropy = np.random.SeedSequence().entropy if seed is None else seed
        seed_key = _split_mix(np.array([int(entropy) % 2**64], dtype=np.uint64))
        place_keys = _split_mix(np.array([int(place) % 2**64 for place in places], dtype=np.uint64))
        self.keys = _split_mix(seed_key ^ place_keys)
        self.draws = 0

    def uniforms(self) -> Any:
        """One uniform number in [0, 1) per image, as float64 (53 random bits each)."""
        import numpy as np

        bits = _split_mix(self.keys + np.uint64(self.draws * _GOLDEN % 2**64))  # wrapping, as the hash
        self.draws += 1
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment


def _split_mix(values: Any) -> Any:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic): a well-mixed 64-bit hash."""
    import numpy as np

    values = values + np.uint64(_GOLDEN)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def decode(
    stepper: Stepper,
    batch: int,
    config: DecodingConfig,
    special: SpecialTokens,
    ops: Any,
    max_words: int,
    vocabulary: Any = None,
    places: list[int] | None = None,
) -> Decoded:
    """Decode a batch of `batch` images as `config` says.

    Args:
        stepper: The model, one step at a time.
        batch: Images in the batch.
        config: The decoding settings (beams, rules, sampling).
        special: Start, end, padding and never-generated tokens.
        ops: `NumpyOps` or `TorchOps`, for the arrays the stepper returns.
        max_words: Most words per caption: the step after them can only give `<end>`.
        vocabulary: The tokenizer, for rules that name words (`bad_endings`, `prefix`, `bad_words`,
            `force_words`); or only its ids of one-token words (a mapping), for `bad_endings`.
        places: Each image's place, which seeds its sampling stream (None: its row in this batch).

    Returns:
        `num_beams` ranked captions per image for beam search, one for greedy decoding and sampling.
    """
    rules = rules_for(config, special, vocabulary, max_words)
    check_every = CHECK_EVERY_ON_A_DEVICE if ops.sync_point() else 1
    if config.constrained:
        return _constrained_beam_search(
            stepper, batch, config, special, ops, max_words, rules, forced_phrases(config, vocabulary)
        )
    if config.num_beams == 1:
        # Sampling's streams only when sampling: a generator per image costs 12 ms a batch of 1,024 on the host,
        # more than a GPU's whole greedy search of the batch (0.35x 0.2's greedy rate on an H200 before this).
        places = list(range(batch)) if places is None else list(places)
        streams = RowStreams(config.seed, places) if config.do_sample else None
        return _one_per_image(stepper, batch, config, special, ops, max_words, rules, check_every, streams)
    return _beam_search(stepper, batch, config, special, ops, max_words, rules, check_every)


def _trimmed(decoded: Decoded, ops: Any) -> Decoded:
    """Drop the trailing columns only padding reached (steps run after every caption ended)."""
    width = max(int(ops.max_along(decoded.lengths.reshape(-1), 0)), 1)
    return Decoded(decoded.tokens[..., :width], decoded.scores, decoded.lengths, decoded.normalised, decoded.met)


def _one_per_image(
    stepper: Stepper,
    batch: int,
    config: DecodingConfig,
    special: SpecialTokens,
    ops: Any,
    max_words: int,
    rules: list,
    check_every: int,
    streams: RowStreams | None,
) -> Decoded:
    """Greedy decoding, or sampling with `do_sample`: one caption per image."""
    state = stepper.start(1)
    previous = ops.full((batch,), special.start, ops.long)
    finished = ops.full((batch,), False, bool)
    lengths = ops.full((batch,), 0, ops.long)
    totals = ops.full((batch,), 0.0, ops.float)
    words = ops.full((batch, 0), special.pad, ops.long)
    shaping = sampling_rules(config) if config.do_sample else []
    for step in range(max_words + 1):
        logits, state = stepper.step(previous, state)
        scores = apply(rules, ops.as_float(logits), words, step, ops)
        log_probs = ops.log_softmax(scores)
        if config.do_sample:
            token = ops.sample(ops.softmax(apply(shaping, scores, words, step, ops)), streams.uniforms())
        else:
            token = ops.argmax(log_probs)
        picked = ops.take(log_probs, token.reshape(-1, 1), 1).reshape(-1)
        token = ops.where(finished, special.pad, token)
        totals = totals + ops.where(finished, 0.0, picked)
        lengths = lengths + ops.where(finished, 0, 1)
        words = ops.concat([words, token.reshape(-1, 1)], 1)
        finished = finished | (token == special.end)
        previous = token
        if (step % check_every == check_every - 1 or step == max_words) and ops.all(finished):
            break
    normalised = length_normalised(totals, lengths, config.length_penalty)
    return _trimmed(
        Decoded(
            words.reshape(batch, 1, -1),
            totals.reshape(batch, 1),
            lengths.reshape(batch, 1),
            normalised.reshape(batch, 1),
        ),
        ops,
    )


def _beam_search(
    stepper: Stepper,
    batch: int,
    config: DecodingConfig,
    special: SpecialTokens,
    ops: Any,
    max_words: int,
    rules: list,
    check_every: int,
) -> Decoded:
    """`num_beams` live hypotheses per image beside pools of the best finished ones (one pool per group of beams)."""
    k, groups = config.num_beams, config.num_beam_groups
    per_group, width = k // groups, max_words + 1
    state = stepper.start(k)
    scores = ops.full((batch, k), NEVER, ops.float)
    scores[:, ::per_group] = 0.0  # each group's beams start as copies of one: expand only its first
    words = ops.full((batch, k, 0), special.pad, ops.long)
    previous = ops.full((batch * k,), special.start, ops.long)
    pools = [_Pool(batch, per_group, width, special, ops) for _ in range(groups)]
    done = ops.full((batch,), False, bool)
    offsets = (ops.arange(batch) * k).reshape(-1, 1)
    ranks = ops.arange(2 * per_group).reshape(1, -1)
    for step in range(width):
        logits, state = stepper.step(previous, state)
        scored = apply(rules, ops.as_float(logits), words.reshape(batch * k, step), step, ops)
        candidates = scores.reshape(batch, k, 1) + ops.log_softmax(scored).reshape(batch, k, -1)
        vocab = candidates.shape[-1]
        flat = candidates.reshape(batch, k * vocab)
        live, chosen, finished_now = [], None, ops.full((batch,), True, bool)
        for group, pool in enumerate(pools):
            part = candidates[:, group * per_group : (group + 1) * per_group, :]
            if chosen is not None and config.diversity_penalty:  # words earlier groups chose at this step cost more
                part = part - config.diversity_penalty * ops.count_tokens(chosen, vocab).reshape(batch, 1, vocab)
            _, index = ops.topk(part.reshape(batch, per_group * vocab), 2 * per_group)
            beam, token = index // vocab + group * per_group, index % vocab
            total = ops.take(flat, beam * vocab + token, 1)  # the model's score, without the diversity penalty
            is_end = token == special.end
            # Live: the best non-finishing candidates. Finished: those ranked among the group's best.
            order = ops.sort_key_order(ops.where(is_end, 2 * per_group, 0) + ranks)[:, :per_group]
            live.append((ops.take(beam, order, 1), ops.take(token, order, 1), ops.take(total, order, 1)))
            keep = is_end & (ranks < per_group) & ops.isfinite(total) & ~done.reshape(-1, 1)
            prefixes = ops.take(words, beam.reshape(batch, -1, 1), 1)
            pool.add(prefixes, ops.where(keep, total, NEVER), step + 1, config.length_penalty, with_end=True)
            finished_now = finished_now & _pool_done(pool, live[-1][2], step + 1, width, config, ops)
            chosen = live[-1][1] if chosen is None else ops.concat([chosen, live[-1][1]], 1)
        beam, token, scores = (ops.concat([part[i] for part in live], 1) for i in range(3))
        words = ops.concat([ops.take(words, beam.reshape(batch, k, 1), 1), token.reshape(batch, k, 1)], 2)
        state = stepper.reorder(state, (beam + offsets).reshape(-1))
        previous = token.reshape(-1)
        done = done | finished_now
        if step % check_every == check_every - 1 and ops.all(done):
            break
    else:  # max_length reached: the live hypotheses of unfinished images join their pools as they are
        for group, pool in enumerate(pools):
            span = slice(group * per_group, (group + 1) * per_group)
            pool.add(
                words[:, span],
                ops.where(done.reshape(-1, 1), NEVER, scores[:, span]),
                width,
                config.length_penalty,
                with_end=False,
            )
    return _trimmed(_ranked(pools, ops), ops)


def _ranked(pools: list[_Pool], ops: Any) -> Decoded:
    """Every pool's captions in one ranking, best first (per-group pools keep diverse groups apart)."""
    if len(pools) == 1:
        return pools[0].decoded()
    normalised = ops.concat([pool.normalised for pool in pools], 1)
    _, order = ops.topk(normalised, normalised.shape[1])
    tokens = ops.concat([pool.tokens for pool in pools], 1)
    return Decoded(
        ops.take(tokens, order.reshape(*order.shape, 1), 1),
        ops.take(ops.concat([pool.scores for pool in pools], 1), order, 1),
        ops.take(ops.concat([pool.lengths for pool in pools], 1), order, 1),
        ops.take(normalised, order, 1),
    )


def _pool_done(pool: _Pool, live_scores: Array, length: int, width: int, config: DecodingConfig, ops: Any) -> Array:
    """Images whose pool is full and whose live hypotheses cannot beat it (see `early_stopping`), or are all
    impossible."""
    full = ops.all_along(ops.isfinite(pool.scores), 1)
    hopeless = ~ops.any_along(ops.isfinite(live_scores), 1)
    if config.early_stopping is True:
        return full | hopeless
    penalty = config.length_penalty
    best = length_normalised(live_scores, length, penalty)
    if config.early_stopping == "never":  # scores only fall as words are added: bound them at either end
        best = ops.where(
            best > length_normalised(live_scores, width, penalty), best, length_normalised(live_scores, width, penalty)
        )
    return (full & (ops.max_along(best, 1) <= ops.min_along(pool.normalised, 1))) | hopeless


class _Pool:
    """The best `size` finished captions of every image, ranked by normalised score."""

    def __init__(self, batch: int, size: int, width: int, special: SpecialTokens, ops: Any) -> None:
        self.batch, self.size, self.width, self.special, self.ops = batch, size, width, special, ops
        self.tokens = ops.full((batch, size, width), special.pad, ops.long)
        self.scores = ops.full((batch, size), NEVER, ops.float)
        self.normalised = ops.full((batch, size), NEVER, ops.float)
        self.lengths = ops.full((batch, size), 0, ops.long)

    def add(self, prefixes: Array, scores: Array, length: int, length_penalty: float, with_end: bool) -> None:
        """Offer `(B, n, t)` hypotheses (their words so far) with their scores (-inf: not offered)."""
        ops, special = self.ops, self.special
        count = prefixes.shape[1]
        parts = [prefixes]
        if with_end:
            parts.append(ops.full((self.batch, count, 1), special.end, ops.long))
        filled = sum(part.shape[2] for part in parts)
        parts.append(ops.full((self.batch, count, self.width - filled), special.pad, ops.long))
        tokens = ops.concat(parts, 2)
        normalised = ops.where(ops.isfinite(scores), length_normalised(scores, length, length_penalty), NEVER)
        lengths = ops.full((self.batch, count), length, ops.long)
        all_normalised = ops.concat([self.normalised, normalised], 1)
        _, best = ops.topk(all_normalised, self.size)  # ties: the earlier hypothesis stays
        self.normalised = ops.take(all_normalised, best, 1)
        self.scores = ops.take(ops.concat([self.scores, scores], 1), best, 1)
        self.lengths = ops.take(ops.concat([self.lengths, lengths], 1), best, 1)
        self.tokens = ops.take(ops.concat([self.tokens, tokens], 1), best.reshape(self.batch, self.size, 1), 1)

    def decoded(self) -> Decoded:
        return Decoded(self.tokens, self.scores, self.lengths, self.normalised)
