"""Device groups: static (explicit members) and dynamic (saved selectors), each a configuration layer."""
