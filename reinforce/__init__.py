"""reinforce: offline dataset reinforcement.

Builds a reinforced store (teacher ensemble soft labels over parametrized augmentations) from an image
dataset; the student side lives in the separate, lighter ``reinforce_loaders`` package.
"""

__version__ = "0.2.0"
