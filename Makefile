# Thin wrappers: every target is a nox session (see noxfile.py), so `make X` and `nox -s X` agree.
NOX ?= nox

.PHONY: demo test artifact lint lock
demo:      ## the whole chain on tiny GLM-5 and GLM-4.5 layout fixtures, on this CPU
	$(NOX) -s demo
test:      ## the test suite (what CI runs)
	$(NOX) -s tests
artifact:  ## the real GLM-5.2 W4A16+MTP artifact (needs GPUs and the hub)
	$(NOX) -s artifact
lint:
	$(NOX) -s lint
lock:      ## regenerate every lockfile in pinned/
	$(NOX) -s lock
