"""The technologist's status page: served by the agent over HTTP(S) (``http_server``), readable only by those
``access`` lets in."""
