//! Modbus TCP server: the PLC's trigger/acknowledge handshake, one unit per camera (unit id = the
//! camera's place in the configuration, from 1). docs/PLC.md has the register map, the timing diagram
//! and the rules; [`Station`] is the handshake itself, free of any network, and the server around it
//! (tokio-modbus) only moves registers in and out.
//!
//! The rules, in short: a rising edge of the `Trigger` coil inspects the camera's next frame as a part
//! (its id from the holding registers); `TriggerAck` answers it, or `TriggerRefused` with a reason when
//! a result is still waiting for its acknowledgement or the request is bad. The result is latched
//! (`ResultReady`, the OK/NG/Error bits, the registers) until a rising edge of `ResultAck`; nothing
//! overwrites it, so a missed acknowledgement loses nothing, it only refuses further triggers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::config::daemon::Trigger;
use crate::config::plc::{Allowed, ModbusConfig};
use crate::source::intake::{self, CameraShared, Triggered};
use crate::telemetry::Metrics;
use crate::types::command;
use crate::types::verdict::{Outcome, VerdictMessage};
use crate::util::sync;

/// Coils (read with function 1, written with 5 or 15).
pub const COIL_TRIGGER: u16 = 0;
pub const COIL_RESULT_ACK: u16 = 1;
pub const COIL_SELECT_RECIPE: u16 = 2;
const COILS: u16 = 3;

/// Discrete inputs (function 2); also bits 0-8 of input register [`IR_STATUS`].
pub const DI_READY: u16 = 0;
pub const DI_TRIGGER_ACK: u16 = 1;
pub const DI_BUSY: u16 = 2;
pub const DI_RESULT_READY: u16 = 3;
pub const DI_OK: u16 = 4;
pub const DI_NG: u16 = 5;
pub const DI_ERROR: u16 = 6;
pub const DI_TRIGGER_REFUSED: u16 = 7;
pub const DI_RECIPE_REFUSED: u16 = 8;
const DISCRETE: u16 = 9;

/// Holding registers (function 3, written with 6 or 16): text is ASCII/UTF-8, two bytes a register,
/// high byte first, NUL-padded.
pub const HR_PART_ID: u16 = 0;
pub const HR_PRODUCT: u16 = 16;
/// Bits 0-2 are the three coils, for PLCs that only write registers.
pub const HR_CONTROL: u16 = 32;
const HOLDING: u16 = 33;
const TEXT_REGS: u16 = 16;
/// The input registers again, read-only, for PLCs that only read holding registers.
pub const HR_RESULT_MIRROR: u16 = 100;

/// Input registers (function 4).
pub const IR_RESULT_SEQ: u16 = 0;
pub const IR_VERDICT: u16 = 2;
pub const IR_SCORE: u16 = 3;
pub const IR_THRESHOLD: u16 = 5;
pub const IR_REGIONS: u16 = 7;
pub const IR_STATUS: u16 = 8;
pub const IR_FRAME_SEQ: u16 = 9;
pub const IR_LATENCY_MS: u16 = 11;
pub const IR_PART_ID: u16 = 12;
pub const IR_PRODUCT: u16 = 28;
pub const IR_RECIPE: u16 = 44;
pub const IR_REFUSAL: u16 = 60;
const INPUTS: u16 = 61;

/// `IR_VERDICT` values.
pub const VERDICT_NONE: u16 = 0;
pub const VERDICT_OK: u16 = 1;
pub const VERDICT_NG: u16 = 2;
pub const VERDICT_SKIPPED: u16 = 3;
pub const VERDICT_ERROR: u16 = 4;

/// Why the last trigger or recipe selection was refused (`IR_REFUSAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Refusal {
    /// A result still waits for its `ResultAck`, or a part is being inspected.
    Busy = 1,
    /// The part id registers do not hold text of 1-128 printable bytes.
    BadPartId = 2,
    /// The product registers do not hold a recipe name (letters, digits, `-`, `_`).
    BadProduct = 3,
    /// The camera is not `trigger = "triggered"`, or not running.
    NotTriggerable = 4,
    /// The camera's trigger queue is full.
    QueueFull = 5,
    /// `SelectRecipe` named a product the camera has no recipe for.
    UnknownProduct = 6,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::BadPartId => "bad_part_id",
            Refusal::BadProduct => "bad_product",
            Refusal::NotTriggerable => "not_triggerable",
            Refusal::QueueFull => "queue_full",
            Refusal::UnknownProduct => "unknown_product",
        }
    }
}

/// Most Modbus connections at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A part whose verdict has not come this long after its trigger's own timeout is latched as an
/// error, so the handshake can never hang.
const VERDICT_GRACE: Duration = Duration::from_secs(30);

/// What the server must do after a write, outside the station's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Trigger the part (its id; the product, None: the recipe in use).
    Trigger {
        part_id: String,
        product: Option<String>,
    },
    SelectRecipe(String),
}

/// One unit's registers and its handshake state.
#[derive(Debug, Clone)]
pub struct Station {
    coils: [bool; COILS as usize],
    holding: [u16; (HOLDING - 1) as usize],
    inputs: [u16; INPUTS as usize],
    ready: bool,
    trigger_ack: bool,
    busy: bool,
    result_ready: bool,
    trigger_refused: bool,
    recipe_refused: bool,
    results: u32,
    parts: u64,
    /// The part being inspected and when its trigger was accepted.
    in_flight: Option<(String, Instant)>,
}

impl Default for Station {
    fn default() -> Self {
        Self {
            coils: [false; COILS as usize],
            holding: [0; (HOLDING - 1) as usize],
            inputs: [0; INPUTS as usize],
            ready: false,
            trigger_ack: false,
            busy: false,
            result_ready: false,
            trigger_refused: false,
            recipe_refused: false,
            results: 0,
            parts: 0,
            in_flight: None,
        }
    }
}

impl Station {
    fn discrete(&self) -> [bool; DISCRETE as usize] {
        let v = self.inputs[IR_VERDICT as usize];
        let latched = self.result_ready;
        [
            self.ready && !self.busy,
            self.trigger_ack,
            self.busy,
            latched,
            latched && v == VERDICT_OK,
            latched && v == VERDICT_NG,
            latched && (v == VERDICT_SKIPPED || v == VERDICT_ERROR),
            self.trigger_refused,
            self.recipe_refused,
        ]
    }

    fn input(&self, i: u16) -> u16 {
        if i == IR_STATUS {
            return self.discrete().iter().enumerate().fold(0, |w, (b, on)| w | (u16::from(*on) << b));
        }
        self.inputs[i as usize]
    }

    /// Whether the camera can take a part now (it is triggered and its worker alive).
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    /// The recipe in use, shown in `IR_RECIPE`.
    pub fn set_recipe(&mut self, recipe: Option<&str>) {
        put_text(&mut self.inputs[IR_RECIPE as usize..(IR_RECIPE + TEXT_REGS) as usize], recipe.unwrap_or(""));
    }

    /// New coil values from `addr` on: the edges become actions. The acknowledgement is taken first, so
    /// that one write of `ResultAck` and `Trigger` together acknowledges, then triggers.
    pub fn write_coils(&mut self, addr: u16, values: &[bool]) -> Vec<Action> {
        let mut next = self.coils;
        for (i, v) in values.iter().enumerate() {
            next[(addr as usize) + i] = *v;
        }
        let rising = |c: u16| next[c as usize] && !self.coils[c as usize];
        let falling = |c: u16| !next[c as usize] && self.coils[c as usize];
        let (ack, select, trigger, trigger_down) =
            (rising(COIL_RESULT_ACK), rising(COIL_SELECT_RECIPE), rising(COIL_TRIGGER), falling(COIL_TRIGGER));
        self.coils = next;
        let mut actions = Vec::new();
        if ack && self.result_ready {
            self.result_ready = false;
            self.busy = false;
        }
        if select {
            self.recipe_refused = false;
            match self.product() {
                Ok(Some(p)) => actions.push(Action::SelectRecipe(p)),
                Ok(None) | Err(_) => self.refuse_recipe(Refusal::BadProduct),
            }
        }
        if trigger_down {
            self.trigger_ack = false;
            self.trigger_refused = false;
        }
        if trigger {
            if self.busy {
                self.refuse(Refusal::Busy);
            } else if !self.ready {
                self.refuse(Refusal::NotTriggerable);
            } else {
                match (self.part_id(), self.product()) {
                    (Err(()), _) => self.refuse(Refusal::BadPartId),
                    (_, Err(())) => self.refuse(Refusal::BadProduct),
                    (Ok(part_id), Ok(product)) => {
                        // Busy at once: a second edge before the server acts is refused, not doubled.
                        self.busy = true;
                        actions.push(Action::Trigger { part_id, product });
                    }
                }
            }
        }
        actions
    }

    /// The part id for the next trigger: the registers' text, or `MB-<n>` when they are all zero.
    fn part_id(&mut self) -> Result<String, ()> {
        let text = get_text(&self.holding[HR_PART_ID as usize..(HR_PART_ID + TEXT_REGS) as usize]).ok_or(())?;
        if text.is_empty() {
            self.parts += 1;
            return Ok(format!("MB-{}", self.parts));
        }
        command::check_part_id(&text).map(|()| text).map_err(|_| ())
    }

    fn product(&self) -> Result<Option<String>, ()> {
        let text = get_text(&self.holding[HR_PRODUCT as usize..(HR_PRODUCT + TEXT_REGS) as usize]).ok_or(())?;
        if text.is_empty() {
            return Ok(None);
        }
        command::check_product(&text).map(|()| Some(text)).map_err(|_| ())
    }

    fn refuse(&mut self, why: Refusal) {
        self.trigger_refused = true;
        self.inputs[IR_REFUSAL as usize] = why as u16;
    }

    /// What the server found when it acted on a trigger: queued, or refused.
    pub fn triggered(&mut self, part_id: &str, outcome: Result<(), Refusal>) {
        match outcome {
            Ok(()) => {
                self.trigger_ack = true;
                self.in_flight = Some((part_id.to_string(), Instant::now()));
            }
            Err(why) => {
                self.busy = false;
                self.refuse(why);
            }
        }
    }

    pub fn refuse_recipe(&mut self, why: Refusal) {
        self.recipe_refused = true;
        self.inputs[IR_REFUSAL as usize] = why as u16;
    }

    /// The verdict of the part in flight: latched until `ResultAck`. A verdict for another part (a
    /// late one) is ignored.
    pub fn latch(&mut self, msg: &VerdictMessage) -> Option<Duration> {
        let flight = self.in_flight.take_if(|(p, _)| msg.part_id.as_deref() == Some(p.as_str()))?;
        let verdict = match msg.verdict {
            Outcome::Ok => VERDICT_OK,
            Outcome::Ng => VERDICT_NG,
            Outcome::Skipped => VERDICT_SKIPPED,
            Outcome::Error => VERDICT_ERROR,
        };
        let (score, threshold) = (msg.score.unwrap_or(f32::NAN), msg.threshold.unwrap_or(f32::NAN));
        Some(self.show(flight, verdict, [score, threshold], msg.regions.len(), msg.seq, msg.product.as_deref()))
    }

    /// `part`, in flight, whose verdict never came: latched as an Error result (no score, no frame).
    pub fn latch_missing(&mut self, part: &str) -> Option<Duration> {
        let flight = self.in_flight.take_if(|(p, _)| p == part)?;
        Some(self.show(flight, VERDICT_ERROR, [f32::NAN; 2], 0, 0, None))
    }

    /// Writes a result into the input registers and raises `ResultReady`; the time since its trigger.
    fn show(
        &mut self,
        (part, at): (String, Instant),
        verdict: u16,
        [score, threshold]: [f32; 2],
        regions: usize,
        frame_seq: u64,
        product: Option<&str>,
    ) -> Duration {
        let took = at.elapsed();
        self.results = self.results.wrapping_add(1);
        let i = &mut self.inputs;
        put_u32(&mut i[IR_RESULT_SEQ as usize..], self.results);
        i[IR_VERDICT as usize] = verdict;
        put_u32(&mut i[IR_SCORE as usize..], score.to_bits());
        put_u32(&mut i[IR_THRESHOLD as usize..], threshold.to_bits());
        i[IR_REGIONS as usize] = regions.min(u16::MAX as usize) as u16;
        put_u32(&mut i[IR_FRAME_SEQ as usize..], frame_seq as u32);
        i[IR_LATENCY_MS as usize] = took.as_millis().min(u16::MAX as u128) as u16;
        put_text(&mut i[IR_PART_ID as usize..(IR_PART_ID + TEXT_REGS) as usize], &part);
        put_text(&mut i[IR_PRODUCT as usize..(IR_PRODUCT + TEXT_REGS) as usize], product.unwrap_or(""));
        self.result_ready = true;
        took
    }

    /// The part in flight, if any.
    pub fn in_flight(&self) -> Option<&str> {
        self.in_flight.as_ref().map(|(p, _)| p.as_str())
    }

    fn read_coils(&self, addr: u16, n: u16) -> Result<Vec<bool>, ExceptionCode> {
        range(addr, n, COILS)?;
        Ok(self.coils[addr as usize..(addr + n) as usize].to_vec())
    }

    fn read_discrete(&self, addr: u16, n: u16) -> Result<Vec<bool>, ExceptionCode> {
        range(addr, n, DISCRETE)?;
        Ok(self.discrete()[addr as usize..(addr + n) as usize].to_vec())
    }

    fn read_inputs(&self, addr: u16, n: u16) -> Result<Vec<u16>, ExceptionCode> {
        range(addr, n, INPUTS)?;
        Ok((addr..addr + n).map(|i| self.input(i)).collect())
    }

    fn read_holding(&self, addr: u16, n: u16) -> Result<Vec<u16>, ExceptionCode> {
        if addr >= HR_RESULT_MIRROR {
            return self.read_inputs(addr - HR_RESULT_MIRROR, n);
        }
        range(addr, n, HOLDING)?;
        Ok((addr..addr + n).map(|a| self.holding_word(a)).collect())
    }

    fn holding_word(&self, a: u16) -> u16 {
        if a == HR_CONTROL {
            return self.coils.iter().enumerate().fold(0, |w, (b, on)| w | (u16::from(*on) << b));
        }
        self.holding[a as usize]
    }

    /// Writes holding registers; the result mirror is read-only (exception 2, as any address outside
    /// the map).
    fn write_holding(&mut self, addr: u16, values: &[u16]) -> Result<Vec<Action>, ExceptionCode> {
        range(addr, values.len() as u16, HOLDING)?;
        let mut actions = Vec::new();
        for (k, v) in values.iter().enumerate() {
            let a = addr + k as u16;
            if a == HR_CONTROL {
                if v & !0b111 != 0 {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                let bits: Vec<bool> = (0..COILS).map(|b| v & (1 << b) != 0).collect();
                actions.extend(self.write_coils(0, &bits));
            } else {
                self.holding[a as usize] = *v;
            }
        }
        Ok(actions)
    }
}

fn range(addr: u16, n: u16, len: u16) -> Result<(), ExceptionCode> {
    if n == 0 || u32::from(addr) + u32::from(n) > u32::from(len) {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(())
}

fn put_u32(regs: &mut [u16], v: u32) {
    regs[0] = (v >> 16) as u16;
    regs[1] = v as u16;
}

/// Text into registers, two bytes each, high byte first, NUL-padded (cut at a character boundary).
pub fn put_text(regs: &mut [u16], text: &str) {
    let mut end = text.len().min(regs.len() * 2);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &text.as_bytes()[..end];
    for (i, r) in regs.iter_mut().enumerate() {
        let b = |k: usize| u16::from(bytes.get(k).copied().unwrap_or(0));
        *r = (b(2 * i) << 8) | b(2 * i + 1);
    }
}

/// Text from registers, up to the first NUL; None when it is not UTF-8.
pub fn get_text(regs: &[u16]) -> Option<String> {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).take_while(|b| *b != 0).collect();
    String::from_utf8(bytes).ok()
}

/// The stations, by unit, and the cameras they drive.
pub struct ModbusServer {
    /// Unit `i + 1` drives camera `units[i]`.
    units: RwLock<Vec<String>>,
    stations: Mutex<BTreeMap<String, Station>>,
    cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
    metrics: Arc<Metrics>,
    allowed: Vec<Allowed>,
    connections: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("modbus.listen = {addr}: {cause}")]
pub struct BindError {
    pub addr: String,
    pub cause: std::io::Error,
}

impl ModbusServer {
    pub fn new(
        cfg: &ModbusConfig,
        units: Vec<String>,
        cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            units: RwLock::new(units),
            stations: Mutex::new(BTreeMap::new()),
            cameras,
            metrics,
            allowed: cfg.allowed(),
            connections: AtomicUsize::new(0),
        })
    }

    /// The cameras after a reload: unit `i + 1` drives `units[i]`.
    pub fn set_units(&self, units: Vec<String>) {
        *sync::write(&self.units) = units;
    }

    /// Binds `cfg.listen` and serves until the task is aborted.
    pub async fn serve(
        self: &Arc<Self>,
        cfg: &ModbusConfig,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BindError> {
        let err = |cause| BindError { addr: cfg.listen.clone(), cause };
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let me = self.clone();
        let task = tokio::spawn(async move {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            let on_connected = |stream: tokio::net::TcpStream, peer: SocketAddr| {
                let conn = me.connect(peer);
                async move { Ok(conn.map(|c| (c, stream))) }
            };
            let on_error = |e: std::io::Error| tracing::debug!("modbus connection ended: {e}");
            if let Err(e) = server.serve(&on_connected, on_error).await {
                tracing::error!("Modbus server stopped: {e}");
            }
        });
        Ok((addr, task))
    }

    /// A client connects: served when its address is allowed and there is room.
    fn connect(self: &Arc<Self>, peer: SocketAddr) -> Option<Connection> {
        if !self.allowed.iter().any(|a| a.contains(peer.ip())) {
            tracing::warn!("Modbus connection from {peer} refused: not in modbus.allow");
            self.metrics.modbus_connection("refused");
            return None;
        }
        if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("Modbus connection from {peer} refused: {MAX_CONNECTIONS} connections are open");
            self.metrics.modbus_connection("limit");
            return None;
        }
        self.metrics.modbus_connection("accepted");
        Some(Connection { server: self.clone() })
    }

    /// One request, answered from the station of its unit; the actions it causes are carried out here.
    pub fn handle(self: &Arc<Self>, unit: u8, req: Request<'_>) -> Result<Response, ExceptionCode> {
        let camera = {
            let units = sync::read(&self.units);
            units.get(usize::from(unit).wrapping_sub(1)).cloned().ok_or(ExceptionCode::GatewayTargetDevice)?
        };
        let cam = sync::lock(&self.cameras).get(&camera).cloned();
        let mut stations = sync::lock(&self.stations);
        let st = stations.entry(camera.clone()).or_default();
        st.set_ready(cam.as_ref().is_some_and(|c| {
            c.trigger_mode() == Trigger::Triggered && c.worker_silent_ms() <= intake::WORKER_STALL_MS
        }));
        st.set_recipe(cam.as_ref().and_then(|c| c.model().recipe.clone()).as_deref());
        let (response, actions) = match req {
            Request::ReadCoils(a, n) => (Response::ReadCoils(st.read_coils(a, n)?), vec![]),
            Request::ReadDiscreteInputs(a, n) => (Response::ReadDiscreteInputs(st.read_discrete(a, n)?), vec![]),
            Request::ReadInputRegisters(a, n) => (Response::ReadInputRegisters(st.read_inputs(a, n)?), vec![]),
            Request::ReadHoldingRegisters(a, n) => (Response::ReadHoldingRegisters(st.read_holding(a, n)?), vec![]),
            Request::WriteSingleCoil(a, v) => {
                range(a, 1, COILS)?;
                (Response::WriteSingleCoil(a, v), st.write_coils(a, &[v]))
            }
            Request::WriteMultipleCoils(a, vs) => {
                range(a, vs.len() as u16, COILS)?;
                (Response::WriteMultipleCoils(a, vs.len() as u16), st.write_coils(a, &vs))
            }
            Request::WriteSingleRegister(a, v) => (Response::WriteSingleRegister(a, v), st.write_holding(a, &[v])?),
            Request::WriteMultipleRegisters(a, vs) => {
                (Response::WriteMultipleRegisters(a, vs.len() as u16), st.write_holding(a, &vs)?)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        for action in actions {
            match (action, &cam) {
                (Action::Trigger { part_id, .. }, None) => {
                    st.triggered(&part_id, Err(Refusal::NotTriggerable));
                    self.metrics.modbus_trigger(&camera, Refusal::NotTriggerable.label());
                }
                (Action::Trigger { part_id, product }, Some(c)) => {
                    let outcome = self.trigger(c, &part_id, product);
                    self.metrics.modbus_trigger(&camera, outcome.err().map_or("accepted", Refusal::label));
                    st.triggered(&part_id, outcome);
                }
                (Action::SelectRecipe(p), Some(c)) => {
                    if c.switch_recipe(&p).is_err() {
                        st.refuse_recipe(Refusal::UnknownProduct);
                    }
                    st.set_recipe(c.model().recipe.as_deref());
                }
                (Action::SelectRecipe(_), None) => st.refuse_recipe(Refusal::UnknownProduct),
            }
        }
        Ok(response)
    }

    /// Queues the part and waits for its verdict on a task of its own, which latches it.
    fn trigger(
        self: &Arc<Self>,
        cam: &Arc<CameraShared>,
        part_id: &str,
        product: Option<String>,
    ) -> Result<(), Refusal> {
        let Some(verdict) = cam.watch_part(part_id) else { return Err(Refusal::QueueFull) };
        if cam.trigger(part_id.to_string(), product) == Triggered::Full {
            return Err(Refusal::QueueFull);
        }
        let limit = *sync::read(&cam.trigger_timeout) + VERDICT_GRACE;
        let (me, camera, part) = (self.clone(), cam.name.clone(), part_id.to_string());
        tokio::spawn(async move {
            let msg = tokio::time::timeout(limit, verdict).await.ok().and_then(Result::ok);
            if msg.is_none() {
                tracing::error!(camera = %camera, "Modbus part {part}: no verdict within {} s", limit.as_secs());
            }
            let mut stations = sync::lock(&me.stations);
            let took = stations.get_mut(&camera).and_then(|st| match &msg {
                Some(m) => st.latch(m),
                None => st.latch_missing(&part),
            });
            drop(stations);
            if let Some(t) = took {
                me.metrics.modbus_result(&camera, t.as_secs_f64());
            }
        });
        Ok(())
    }
}

/// One client's connection: the service tokio-modbus calls for each of its requests.
pub struct Connection {
    server: Arc<ModbusServer>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.server.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service for Connection {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let out = self.server.handle(req.slave, req.request);
        if let Err(e) = &out {
            self.server.metrics.modbus_exception(u8::from(*e));
        }
        std::future::ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_regs(s: &str) -> Vec<u16> {
        let mut r = vec![0; TEXT_REGS as usize];
        put_text(&mut r, s);
        r
    }

    fn verdict(part: &str, v: Outcome) -> VerdictMessage {
        let cam = crate::source::intake::Intake::new_test("c", 1, true, Trigger::Triggered).intake.camera;
        let mut m = cam.skeleton(7, "c-0-7".into(), Some(part.into()), std::time::SystemTime::now(), None);
        m.verdict = v;
        m.score = Some(41.5);
        m.threshold = Some(33.25);
        m.seq = 7;
        m
    }

    #[test]
    fn text_round_trips_through_registers_and_is_cut_at_a_character() {
        assert_eq!(get_text(&text_regs("P-000731")).unwrap(), "P-000731");
        assert_eq!(text_regs("AB")[0], 0x4142);
        let long = "é".repeat(20);
        let back = get_text(&text_regs(&long)).unwrap();
        assert_eq!(back, "é".repeat(16), "32 bytes, no half character");
        assert!(get_text(&[0xff00]).is_none());
    }

    #[test]
    fn the_handshake_latches_each_result_until_it_is_acknowledged() {
        let mut st = Station::default();
        st.set_ready(true);
        st.write_holding(HR_PART_ID, &text_regs("P-1")).unwrap();
        let a = st.write_coils(COIL_TRIGGER, &[true]);
        assert_eq!(a, [Action::Trigger { part_id: "P-1".into(), product: None }]);
        st.triggered("P-1", Ok(()));
        assert!(st.trigger_ack && st.busy && !st.discrete()[DI_READY as usize]);
        // A second rising edge while busy is refused, and nothing is triggered.
        st.write_coils(COIL_TRIGGER, &[false]);
        assert!(st.write_coils(COIL_TRIGGER, &[true]).is_empty());
        assert_eq!((st.trigger_refused, st.input(IR_REFUSAL)), (true, Refusal::Busy as u16));
        st.write_coils(COIL_TRIGGER, &[false]);
        assert!(!st.trigger_refused && !st.trigger_ack, "both clear when Trigger falls");
        // A verdict for another part does not latch; this part's does.
        assert!(st.latch(&verdict("P-0", Outcome::Ng)).is_none());
        assert!(st.latch(&verdict("P-1", Outcome::Ng)).is_some());
        let d = st.discrete();
        assert!(d[DI_RESULT_READY as usize] && d[DI_NG as usize] && !d[DI_OK as usize] && d[DI_BUSY as usize]);
        assert_eq!(st.read_inputs(IR_RESULT_SEQ, 3).unwrap(), [0, 1, VERDICT_NG]);
        let score = st.read_inputs(IR_SCORE, 2).unwrap();
        assert_eq!(f32::from_bits((u32::from(score[0]) << 16) | u32::from(score[1])), 41.5);
        assert_eq!(get_text(&st.read_inputs(IR_PART_ID, TEXT_REGS).unwrap()).unwrap(), "P-1");
        assert_eq!(st.read_holding(HR_RESULT_MIRROR + IR_VERDICT, 1).unwrap(), [VERDICT_NG]);
        assert_eq!(st.input(IR_STATUS) & (1 << DI_RESULT_READY), 1 << DI_RESULT_READY);
        // The acknowledgement (here through the control register, with the next trigger in the same
        // write) clears the result, then the trigger is taken.
        st.write_holding(HR_PART_ID, &text_regs("")).unwrap();
        let a = st.write_holding(HR_CONTROL, &[0b011]).unwrap();
        assert_eq!(a, [Action::Trigger { part_id: "MB-1".into(), product: None }], "all-zero registers: numbered");
        assert!(!st.result_ready && st.busy);
        // Its verdict never comes: an Error result, without a score.
        st.triggered("MB-1", Ok(()));
        assert!(st.latch_missing("MB-0").is_none(), "not the part in flight");
        assert!(st.latch_missing("MB-1").is_some());
        assert_eq!(st.read_inputs(IR_VERDICT, 1).unwrap(), [VERDICT_ERROR]);
        let score = st.read_inputs(IR_SCORE, 2).unwrap();
        assert!(f32::from_bits((u32::from(score[0]) << 16) | u32::from(score[1])).is_nan());
        assert!(st.discrete()[DI_ERROR as usize]);
    }

    #[test]
    fn only_allowed_clients_connect_and_at_most_sixteen_at_once() {
        let metrics = Arc::new(Metrics::new());
        let cfg = ModbusConfig { listen: String::new(), allow: vec!["10.0.0.0/24".into()] };
        let server = ModbusServer::new(&cfg, vec!["cam".into()], Arc::default(), metrics.clone());
        let peer = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 40000);
        assert!(server.connect(peer("127.0.0.1")).is_none(), "loopback is not in this allowlist");
        assert!(server.connect(peer("10.0.1.9")).is_none());
        let open: Vec<Connection> = (0..MAX_CONNECTIONS).map(|_| server.connect(peer("10.0.0.7")).unwrap()).collect();
        assert!(server.connect(peer("10.0.0.8")).is_none(), "the seventeenth waits for one to close");
        drop(open);
        assert!(server.connect(peer("10.0.0.8")).is_some());
        let sample = |r: &str| metrics.sample(&format!("anomalyd_modbus_connections_total{{result=\"{r}\"}}"));
        assert_eq!((sample("refused"), sample("limit"), sample("accepted")), (Some(2.0), Some(1.0), Some(17.0)));
        // A unit with no camera behind it, and a camera that is not running.
        assert_eq!(server.handle(2, Request::ReadCoils(0, 1)).unwrap_err(), ExceptionCode::GatewayTargetDevice);
        assert_eq!(server.handle(0, Request::ReadCoils(0, 1)).unwrap_err(), ExceptionCode::GatewayTargetDevice);
        server.handle(1, Request::WriteSingleCoil(COIL_TRIGGER, true)).unwrap();
        let Response::ReadInputRegisters(r) = server.handle(1, Request::ReadInputRegisters(IR_REFUSAL, 1)).unwrap()
        else {
            panic!("not a register read")
        };
        assert_eq!(r, [Refusal::NotTriggerable as u16]);
    }

    /// Random writes and reads, as a confused or hostile client would send them, with verdicts arriving
    /// at random: nothing panics, at most one part is ever in flight, a trigger is only taken when the
    /// station is not busy, and a latched result is only cleared by an acknowledgement.
    #[test]
    fn random_requests_never_break_the_handshake() {
        let mut rng = crate::util::rng::Rng::new(7);
        let mut st = Station::default();
        let (mut taken, mut latched) = (0, 0);
        for step in 0..20_000 {
            st.set_ready(rng.below(10) != 0);
            let addr = rng.below(140) as u16;
            let n = 1 + rng.below(4) as u16;
            let before = (st.busy, st.result_ready, st.coils[COIL_RESULT_ACK as usize]);
            let actions = match rng.below(6) {
                0 => {
                    let v: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
                    if range(addr, n, COILS).is_ok() { st.write_coils(addr, &v) } else { vec![] }
                }
                1 => {
                    // Mostly text or zeros (the part id and product a PLC writes), sometimes any bits.
                    let word = |rng: &mut crate::util::rng::Rng| match rng.below(4) {
                        0 => rng.next_u64() as u16,
                        1 => 0,
                        _ => (0x41 + rng.below(26) as u16) << 8 | (0x30 + rng.below(10) as u16),
                    };
                    let v: Vec<u16> = (0..n).map(|_| word(&mut rng)).collect();
                    let at = if rng.below(2) == 0 { addr } else { rng.below(32) as u16 };
                    st.write_holding(at, &v).unwrap_or_default()
                }
                2 => st.write_holding(HR_CONTROL, &[rng.below(8) as u16]).unwrap(),
                3 => {
                    let _ = (st.read_inputs(addr, n), st.read_holding(addr, n), st.read_discrete(addr, n));
                    vec![]
                }
                4 => {
                    if let Some(p) = st.in_flight().map(str::to_string)
                        && st.latch(&verdict(&p, Outcome::Ok)).is_some()
                    {
                        latched += 1;
                    }
                    vec![]
                }
                _ => {
                    let _ = st.read_coils(addr, n);
                    vec![]
                }
            };
            // One write may acknowledge a latched result and trigger the next part: the ack comes first.
            let acked = before.1 && !before.2 && st.coils[COIL_RESULT_ACK as usize];
            for a in actions {
                if let Action::Trigger { part_id, .. } = a {
                    assert!(!before.0 || acked, "step {step}: a trigger was taken while busy");
                    assert!(st.in_flight().is_none(), "step {step}: two parts in flight");
                    st.triggered(&part_id, Ok(()));
                    taken += 1;
                }
            }
            if before.1 && !st.result_ready {
                assert!(st.coils[COIL_RESULT_ACK as usize], "step {step}: a result cleared without ResultAck");
            }
            assert!(!st.result_ready || st.busy, "step {step}: a latched result while not busy");
            assert!(st.in_flight().is_none() || st.busy, "step {step}: a part in flight while not busy");
        }
        assert!(taken > 100 && latched > 100, "the walk exercised the handshake: {taken} taken, {latched} latched");
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason_or_an_exception() {
        let mut st = Station::default();
        st.write_coils(COIL_TRIGGER, &[true]);
        assert_eq!(st.input(IR_REFUSAL), Refusal::NotTriggerable as u16, "not ready");
        st.write_coils(COIL_TRIGGER, &[false]);
        st.set_ready(true);
        st.write_holding(HR_PART_ID, &[0x0A41]).unwrap();
        assert!(st.write_coils(COIL_TRIGGER, &[true]).is_empty());
        assert_eq!(st.input(IR_REFUSAL), Refusal::BadPartId as u16, "a control character");
        st.write_coils(COIL_TRIGGER, &[false]);
        st.write_holding(HR_PART_ID, &text_regs("P-2")).unwrap();
        st.write_holding(HR_PRODUCT, &text_regs("a/b")).unwrap();
        assert!(st.write_coils(COIL_TRIGGER, &[true]).is_empty());
        assert_eq!(st.input(IR_REFUSAL), Refusal::BadProduct as u16);
        assert!(st.write_coils(COIL_SELECT_RECIPE, &[true]).is_empty() && st.recipe_refused);
        // Read-only and unknown addresses, and values the control register does not take.
        assert_eq!(st.write_holding(HR_RESULT_MIRROR, &[1]).unwrap_err(), ExceptionCode::IllegalDataAddress);
        assert_eq!(st.write_holding(HOLDING, &[1]).unwrap_err(), ExceptionCode::IllegalDataAddress);
        assert_eq!(st.write_holding(HR_CONTROL, &[0x8000]).unwrap_err(), ExceptionCode::IllegalDataValue);
        assert_eq!(st.read_inputs(INPUTS - 1, 2).unwrap_err(), ExceptionCode::IllegalDataAddress);
        assert_eq!(st.read_coils(0, 0).unwrap_err(), ExceptionCode::IllegalDataAddress);
    }
}
