"""Random sequences of arrivals, calls, tool calls, closures, capacity changes and
replica losses against the policy core, planned and applied after every event the
way the controller does, with ``check_integrity`` asserted after every step."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controller.policy import ClusterState, Phase, PlannerConfig, ReplicaSpec, Tier, TierPlanner

capacity = st.integers(min_value=0, max_value=8).map(lambda n: n * 50)
# Resizes keep GPU tiers at least this big, so only a lost replica can strand an
# accepted request; requests up to 260 tokens are oversized for the smallest ones.
MIN_GPU = 200


class PolicyMachine(RuleBasedStateMachine):
    @initialize(
        replicas=st.lists(st.tuples(capacity, capacity), min_size=1, max_size=3),
        shared=capacity,
        displacement=st.booleans(),
        shared_tier=st.booleans(),
    )
    def setup(self, replicas, shared, displacement, shared_tier):
        specs = [ReplicaSpec(f"r{i}", max(gpu, MIN_GPU), dram) for i, (gpu, dram) in enumerate(replicas)]
        self.state = ClusterState(specs, shared)
        self.planner = TierPlanner(PlannerConfig(displacement=displacement, shared_tier=shared_tier))
        self.now = 0.0
        self.counter = 0
        self.next_replica = len(specs)

    def plan(self):
        plan = self.planner.plan(self.state, self.now)
        self.state.apply(plan, self.now)
        self.state.check_integrity()
        for admit in plan.admits:
            record = self.state.sessions[admit.session_id]
            assert record.phase is Phase.LLM and record.location.tier is Tier.GPU
            assert record.footprint == admit.tokens == record.request.need_tokens
        for move in plan.moves:
            if move.dst.tier is Tier.GPU:
                assert move.is_promotion

    def sessions_in(self, phase):
        return sorted(s for s, r in self.state.sessions.items() if r.phase is phase and not r.closing)

    @rule()
    def open(self):
        self.counter += 1
        self.state.open_session(f"s{self.counter}", self.now)
        self.plan()

    @rule(data=st.data(), prompt=st.integers(1, 200), max_out=st.integers(1, 60))
    def request(self, data, prompt, max_out):
        idle = self.sessions_in(Phase.TOOL)
        if not idle:
            return
        session_id = data.draw(st.sampled_from(idle))
        if prompt + max_out > self.state.largest_gpu():
            try:
                self.state.request_arrived(session_id, self.now, prompt, max_out)
            except ValueError:
                return
            raise AssertionError("an oversized request was accepted")
        self.state.request_arrived(session_id, self.now, prompt, max_out)
        self.plan()

    @rule(data=st.data())
    def finish(self, data):
        running = sorted(s for s, r in self.state.sessions.items() if r.phase is Phase.LLM)
        if not running:
            return
        session_id = data.draw(st.sampled_from(running))
        footprint = self.state.sessions[session_id].footprint
        self.state.call_finished(session_id, self.now, data.draw(st.integers(1, footprint)))
        self.plan()

    @rule(data=st.data())
    def abandon(self, data):
        """An admitted call whose caller left before it reached the engine."""
        running = sorted(s for s, r in self.state.sessions.items() if r.phase is Phase.LLM)
        if not running:
            return
        session_id = data.draw(st.sampled_from(running))
        kept = self.state.sessions[session_id].request.kept_context
        self.state.call_abandoned(session_id, self.now)
        record = self.state.sessions[session_id]
        assert record.phase is Phase.TOOL and record.context_tokens == kept
        assert record.footprint == (kept if record.location.tier is Tier.GPU else 0)
        self.plan()

    @rule(ttl=st.floats(0, 2000, allow_nan=False))
    def expire(self, ttl):
        for session_id in self.state.idle_sessions(self.now, ttl):
            assert self.state.sessions[session_id].phase is Phase.TOOL
            self.state.close_session(session_id, self.now)
        self.plan()

    @rule(data=st.data())
    def tool_finished(self, data):
        idle = self.sessions_in(Phase.TOOL)
        if idle:
            self.state.tool_call_finished(data.draw(st.sampled_from(idle)), self.now)
            self.plan()

    @rule(prompt=st.integers(1, 200), max_out=st.integers(1, 60))
    def arrive_new(self, prompt, max_out):
        self.counter += 1
        self.state.open_session(f"s{self.counter}", self.now)
        if prompt + max_out <= self.state.largest_gpu():
            self.state.request_arrived(f"s{self.counter}", self.now, prompt, max_out)
        self.plan()

    # Closing only a crowd keeps sessions around long enough to build pressure.
    @precondition(lambda self: len(self.state.sessions) > 6)
    @rule(data=st.data())
    def close(self, data):
        self.state.close_session(data.draw(st.sampled_from(sorted(self.state.sessions))), self.now)
        self.plan()

    @rule(seconds=st.floats(0, 1000, allow_nan=False))
    def tick(self, seconds):
        self.now += seconds
        self.plan()

    @rule(data=st.data(), gpu=capacity, dram=capacity)
    def resize(self, data, gpu, dram):
        replica = data.draw(st.sampled_from(sorted(self.state.replicas)))
        self.state.set_replica(ReplicaSpec(replica, max(gpu, MIN_GPU), dram))
        self.plan()

    @rule(shared=capacity)
    def resize_shared(self, shared):
        self.state.set_shared_capacity(shared)
        self.plan()

    @precondition(lambda self: len(self.state.replicas) > 1)
    @rule(data=st.data())
    def lose_replica(self, data):
        replica = data.draw(st.sampled_from(sorted(self.state.replicas)))
        lost = self.state.remove_replica(replica, self.now)
        for session_id in lost:
            assert self.state.sessions[session_id].location.tier is Tier.WAITING
        self.plan()

    @rule(gpu=capacity, dram=capacity)
    def add_replica(self, gpu, dram):
        self.state.set_replica(ReplicaSpec(f"r{self.next_replica}", max(gpu, MIN_GPU), dram))
        self.next_replica += 1
        self.plan()

    @invariant()
    def oversized_requests_say_so(self):
        plan = self.planner.plan(self.state, self.now)
        largest = self.state.largest_gpu()
        for gate in plan.gates:
            need = self.state.sessions[gate.session_id].request.need_tokens
            assert ("largest replica holds" in gate.reason) == (need > largest), gate


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
