"""SSH to the VM through relays: the only package that talks paramiko."""
