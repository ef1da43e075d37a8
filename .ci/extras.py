"""Print the requirements of setup.cfg's extras (one place lists them), e.g.
`pip install $(python .ci/extras.py docs lint)`."""
import configparser
import os
import sys

cfg = configparser.ConfigParser()
cfg.read(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "setup.cfg"))
extras = cfg["options.extras_require"]
for name in sys.argv[1:]:
    for req in extras[name].strip().splitlines():
        print(req.strip())
