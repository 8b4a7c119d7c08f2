"""The models the engine runs: `LeanDecoder` (a Hugging Face causal LM's weights in a lean forward that writes
and reads a K/V cache), the attention kernels (SDPA with a mask, the Triton kernel), and the EAGLE-style draft
head's decoder (`HeadDecoder`).

May import: torch, transformers, `drafting.records`. Nothing else of the engine: the K/V cache is passed in."""
