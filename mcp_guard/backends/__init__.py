"""Database backends behind one interface; see `base.Backend`."""
