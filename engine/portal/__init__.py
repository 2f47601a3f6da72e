"""The buyer portal in the browser (#18, docs/portal.md "The portal"): a Starlette app with
Jinja2 templates, served under ``/portal`` beside the bare hot path, acting through the
API's own guard and handlers (engine.api.app.App.call_as) for its session's user."""
