"""Work-directory sync: the local folder mirrored into the kernel's remote work dir, and outputs brought back."""
