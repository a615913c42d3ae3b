"""A module that prints when imported, as torchao and torch do: the fork server's output test preloads it."""

import os
import sys

print("noisy import on stdout")
print("noisy import on stderr", file=sys.stderr)
os.write(2, b"noisy native stderr\n")
