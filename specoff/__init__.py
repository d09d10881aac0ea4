"""specoff: speculative decoding for models offloaded to host memory."""
