"""Optional engines that run a job's stages elsewhere than this process (``--engine ray``)."""
