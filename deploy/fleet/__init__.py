"""Fleet model lifecycle: device groups and staged rollouts of a bundle across devices.

* :mod:`deploy.fleet.store`   groups, rollouts and each device's step, in the archive database
* :mod:`deploy.fleet.rollout` waves (canary first), halting at the first failure, resuming
* :mod:`deploy.fleet.offer`   one device's offer over MQTT (the ``omis ota publish`` path)

See docs/fleet.md.
"""
