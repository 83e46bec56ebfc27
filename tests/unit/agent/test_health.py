from agent.health import PsutilProbe, SimulatedProbe


async def test_psutil_probe_measures_this_machine(tmp_path):
    probe = PsutilProbe(tmp_path)
    sample = await probe.sample()
    for value in (sample.cpu_percent, sample.memory_percent, sample.disk_percent):
        assert 0.0 <= value <= 100.0
    assert sample.uptime_s > 0
    assert sample.memory_percent > 0
    assert sample.disk_percent > 0


async def test_psutil_probe_flags_a_full_machine_unhealthy(tmp_path):
    assert (await PsutilProbe(tmp_path, max_percent=100.0).sample()).healthy
    assert not (await PsutilProbe(tmp_path, max_percent=0.0).sample()).healthy


async def test_simulated_probe_is_deterministic_per_seed():

    async def run(seed):
        probe = SimulatedProbe(seed, clock=lambda: 0.0)
        return [await probe.sample() for _ in range(20)]

    assert await run(1) == await run(1)
    assert await run(1) != await run(2)


async def test_simulated_numbers_stay_in_range_and_uptime_follows_the_clock():
    now = [100.0]
    probe = SimulatedProbe(3, clock=lambda: now[0])
    first = await probe.sample()
    for _ in range(2000):
        sample = await probe.sample()
        for value in (sample.cpu_percent, sample.memory_percent, sample.disk_percent):
            assert 0.0 <= value <= 100.0
    now[0] += 60.0
    later = await probe.sample()
    assert abs(later.uptime_s - first.uptime_s - 60.0) < 0.2


async def test_simulated_probe_can_turn_unhealthy():
    probe = SimulatedProbe(5)
    assert (await probe.sample()).healthy
    probe.healthy = False
    assert not (await probe.sample()).healthy
