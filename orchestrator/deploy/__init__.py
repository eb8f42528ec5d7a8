"""Deployment of a trained meta-network: sub-net search (section 4.2), export (section 3.1), analysis plots."""
