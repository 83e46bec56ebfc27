"""Certificate lifecycle after enrollment: renewal over the device's own mTLS session."""
