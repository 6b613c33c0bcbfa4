"""Code that runs on the notebook VM: standard library only (plus paramiko where noted)."""
