"""Speculative decoding's mechanics: the draft tree (`TreeDrafter`), the verify tree, the lossless walk
(`accept`), position-keyed Gumbel noise and sampling (`noise`, `sampling`), and the step's stages (plain, root,
level, verify) over the static buffers one object owns (`stages`).

May import: `drafting.model`, `drafting.records`. The strategy and the caches are passed in."""
