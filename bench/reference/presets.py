"""The model: block of configs/models/<name>.yaml, for the reference scripts (no PyYAML needed)."""

import os
import sys


def preset_block(root, name, required=()):
    """The scalar keys of the preset's model: block as strings; exits naming the file and the key
    when one of `required` is missing. Nested mappings (router_balance) are skipped."""
    path = os.path.join(root, "configs", "models", name + ".yaml")
    if not os.path.exists(path):
        sys.exit(f"{path}: no such preset")
    out = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].rstrip()
            if not line.startswith("  ") or line.startswith("    ") or ":" not in line:
                continue
            key, value = (s.strip() for s in line.split(":", 1))
            if value:
                out[key] = value
    for key in required:
        if key not in out:
            sys.exit(f"{path}: model.{key} is missing")
    return out
