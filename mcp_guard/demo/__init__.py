"""The built-in demo: a small shop database, a default policy, and a scripted walkthrough."""
