"""Files that ship with the package (the demo's pre-trained digits backbone)."""

import os

DIGITS_BACKBONE = os.path.join(os.path.dirname(__file__), 'digits_vit.npz')
