"""Checkpoints on disk: reading, checking, converting, sharding, merging, quantizing, downloading, synthesising."""
