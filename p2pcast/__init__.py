"""p2pcast: peer-to-peer container-image broadcast for HPC clusters."""

__version__ = "0.1.0"
