"""What every part of Slipstream shares: errors, addresses, digests, sizes, compression.

Nothing here imports the splitter, the client or the server.
"""
