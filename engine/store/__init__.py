"""Redis: the Store, the one script registry, the Lua protocol, the streams
consumer, the embedded redis-server. Imports only engine.core."""
