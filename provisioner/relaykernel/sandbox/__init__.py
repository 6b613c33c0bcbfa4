"""A relay and a notebook VM on loopback, built from real OpenSSH servers, for the demo and the tests."""
