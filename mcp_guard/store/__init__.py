"""The audit store behind one interface; see `base.Store`."""
