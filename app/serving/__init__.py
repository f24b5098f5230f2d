"""The generation engine: the base model once, every live version beside it in shared batches.

- `handlers`: the OpenAI-compatible handlers (and `/v1/ab`) over an engine; `protocol` their
  request and response models; `traffic` the neutral hook through which experiments route
  requests and hear of finished responses; `provider` builds the handlers on first use.
- `engine` (decoding loop on one compute thread, version cache, admission), `batcher`,
  `decoding`, `sampling`, `weights` (per-row delta hooks), `cache`, `source` (the interfaces the
  engine reads versions through), `export` (a version as PEFT, merged or delta).
- `factory`: the engine built from the settings, with the store as its version source and Redis
  announcements; the only module here that knows Settings, the store and Redis.

Torch-free at import: `protocol`, `handlers`, `traffic`, `provider`, `errors`, `sampling` and
`source`; the others need torch and are imported when generation (or an export) is used.
"""
