"""What the picker knows about its endpoints: the immutable snapshot and what refreshes it."""
