"""HTTP routers: they parse, call the store or the broker, and shape the answer; no SQL here."""
