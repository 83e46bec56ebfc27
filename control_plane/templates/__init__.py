"""Store templates: the devices a store should have, per-role configuration, time zone and
trading hours; versioned (a change is a new immutable version, stores keep theirs)."""
