"""Pure torch + transformers: models, deltas, DINM, corpus unlearning, generation, judges,
evaluation (README.md's "Layout" names the modules).

No web, database or broker code lives here; import the submodules directly
(`from app.ml.dinm import dinm_edit`), so that light imports (errors, safeedit) stay free of torch.
"""
