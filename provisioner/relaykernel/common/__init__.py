"""What the laptop side and the VM side share: errors, destinations, wire constants (standard library only)."""
