"""Tokenized, checksummed token shards and a resumable streaming loader.

This package imports nothing else of gptrain's (launcher -> training -> sharding).
"""
