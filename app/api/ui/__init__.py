"""The web playground's files (HTML, ES modules, CSS in `static/`), served by `app.api.routes.ui`.
No build step: what is in `static/` is what the browser gets."""
