"""Built-in tasks that train a model under the Recorder. The recording core never imports them."""
