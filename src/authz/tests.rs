//! Decision pipeline unit tests against the in-memory store.
