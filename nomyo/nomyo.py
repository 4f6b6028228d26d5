"""The published client's module path of the facade (`from nomyo.nomyo import
SecureChatCompletion`); new code imports it from `nomyo`."""
from nomyo.client.facade import SecureChatCompletion

__all__ = ["SecureChatCompletion"]
