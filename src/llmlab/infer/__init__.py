"""Decoding: sampling, generation loops, beam search, speculative decoding."""
