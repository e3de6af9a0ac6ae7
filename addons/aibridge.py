"""mitmdump entry point: `mitmdump -s addons/aibridge.py`. Builds the addon chain; nothing else."""

from aibridge_gw.addon import Gateway

addons = [Gateway()]
