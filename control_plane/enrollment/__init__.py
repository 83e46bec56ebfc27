"""Enrollment: tokens, and turning a token + CSR into a device with a certificate."""
