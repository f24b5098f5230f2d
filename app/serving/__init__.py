"""The generation engine: the base model once, every live version beside it in shared batches.

Torch-free at import (the API imports `protocol`, `serving`, `provider`, `errors` and `sampling`);
`engine`, `decoding`, `weights`, `source` and `export` need torch and are imported when
generation (or an export) is used.
"""
