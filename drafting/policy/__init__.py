"""Drafting policy: the strategy protocol (`DraftStrategy`: how deep, how wide, which nodes), `adaptive`'s host and
device policies over one step-time model and one acceptance predictor, the calibration model, and the verdict
(whether drafting can pay). Pure and replayable: `bench.simulate` runs the same objects.

May import: `drafting.spec` (tree helpers), `drafting.model.head` (a draft directory's kind), `drafting.records`."""
