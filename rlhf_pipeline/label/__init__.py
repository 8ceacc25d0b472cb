"""`rlhf label`: human preferences collected in the browser, and human A/B judgements of two models.

- `stats`: rankings expanded to preference pairs (InstructGPT's way), agreement between labelers, win rates with a
  Wilson interval. Pure Python.
- `store`: the labelling run on disk: the stored samples, every label appended and fsync'd as given, the preference
  dataset in TRL's format, which labeler sees which prompt next. No torch, no Gradio.
- `sampler`: the background thread that samples the responses ahead of the labelers, each prompt under its own seed.
- `app`: the Gradio page. `serve`: the command (checks, models, sampler, server).
"""
