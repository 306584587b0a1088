"""Choosing endpoints: profiles of filters, weighted scorers and a picker over one snapshot."""
