"""The verification campaign: the project's main job (`refcache verify`)."""
