"""The caching proxy: its protocol and factory with the cache rules
(`factory`), the memory cache (`cache`, and `allocator` for the C
allocator's share of its bound), the shared tier on memcached
(`sharedcache`: its signed entries in `sharedentry`, its nodes in
`sharednode`, placed by `ring`), and the way to the servers
(`upstream`: a pool of connections to one; `balancer`: several). It never
reads a payload, so it never imports the calculator."""
