"""The wire: protocol facts, sealing and opening packages, key pairs, the base64 codec.

Shared by the client and the server; depends only on `nomyo.memory` and `nomyo.errors`.
"""
