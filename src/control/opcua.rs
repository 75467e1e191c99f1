//! OPC UA server (`[opcua]`, async-opcua): per camera its state, its recipe and its last result as
//! variables, a `ResultReady` event per verdict, and the methods `Trigger` and `SelectRecipe`. The node
//! tree is shaped after OPC 40100 (Machine Vision) without its full state machine; docs/PLC.md draws
//! it. Sessions need a configured user (a password read from a file, or a user certificate), endpoints
//! sign and encrypt unless `none` is configured, and anonymous sessions are refused unless allowed.
//!
//! The frame path never waits for this server: each camera's verdicts reach it through a bounded
//! broadcast ([`CameraShared::results`]); a server that falls behind skips ahead and counts what it
//! skipped (`anomalyd_opcua_results_missed_total`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use opcua::crypto::{CertificateStore, SecurityPolicy, Thumbprint};
use opcua::nodes::BaseEventType;
use opcua::server::address_space::{
    AddressSpace, EventNotifier, MethodBuilder, ObjectBuilder, ObjectTypeBuilder, VariableBuilder,
};
use opcua::server::authenticator::{AuthManager, Password, UserToken, user_pass_security_policy_id};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use opcua::server::{
    ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerEndpoint, ServerHandle, ServerUserToken, SubscriptionCache,
};
use opcua::types::{
    Argument, DataTypeId, DataValue, DateTime, LocalizedText, MessageSecurityMode, NodeClass, NodeId, ObjectId,
    ObjectTypeId, QualifiedName, StatusCode, UAString, UserTokenPolicy, UserTokenType, VariableTypeId, Variant,
};

use crate::config::daemon::{Secret, Trigger, read_secret};
use crate::config::plc::OpcUaConfig;
use crate::source::intake::{CameraShared, Triggered};
use crate::telemetry::Metrics;
use crate::types::command;
use crate::types::verdict::VerdictMessage;
use crate::util::sync;

/// The namespace of anomalyd's nodes.
pub const NAMESPACE: &str = "urn:anomalyd";

/// How often subscriptions are checked and may publish, in ms.
const POLL_MS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum OpcUaError {
    #[error("opcua.listen = {addr}: {cause}")]
    Bind { addr: String, cause: std::io::Error },
    #[error("opcua.user[{index}]: {path}: {cause}")]
    Secret { index: usize, path: PathBuf, cause: std::io::Error },
    #[error("opcua.user[{index}].certificate = {path}: not an X.509 certificate (DER or PEM)")]
    Certificate { index: usize, path: PathBuf },
    #[error("opcua: {0}")]
    Server(String),
}

/// The `ResultReady` event: a verdict, as a subtype of BaseEventType with the result's fields.
#[derive(opcua::Event)]
#[opcua(identifier = "s=ResultReadyEventType", namespace = "urn:anomalyd")]
struct ResultReady {
    base: BaseEventType,
    own_namespace_index: u16,
    result_seq: u32,
    result_id: String,
    part_id: String,
    product_id: String,
    verdict: String,
    score: f64,
    threshold: f64,
    regions: u32,
}

/// The event's own fields: (browse name, data type), as the event type's properties declare them.
const EVENT_FIELDS: [(&str, DataTypeId); 8] = [
    ("ResultSeq", DataTypeId::UInt32),
    ("ResultId", DataTypeId::String),
    ("PartId", DataTypeId::String),
    ("ProductId", DataTypeId::String),
    ("Verdict", DataTypeId::String),
    ("Score", DataTypeId::Double),
    ("Threshold", DataTypeId::Double),
    ("Regions", DataTypeId::UInt32),
];

/// Who may open a session: password users, certificate users, and anonymous when configured.
struct Users {
    passwords: Vec<(String, Secret)>,
    certificates: Vec<(String, Thumbprint)>,
    anonymous: bool,
    metrics: Arc<Metrics>,
}

impl Users {
    fn load(cfg: &OpcUaConfig, metrics: Arc<Metrics>) -> Result<Self, OpcUaError> {
        let (mut passwords, mut certificates) = (Vec::new(), Vec::new());
        for (index, u) in cfg.user.iter().enumerate() {
            if let Some(path) = &u.password_file {
                let secret =
                    read_secret(path).map_err(|cause| OpcUaError::Secret { index, path: path.clone(), cause })?;
                passwords.push((u.name.clone(), Secret(secret)));
            }
            if let Some(path) = &u.certificate {
                let cert = CertificateStore::read_cert(path)
                    .map_err(|_| OpcUaError::Certificate { index, path: path.clone() })?;
                certificates.push((u.name.clone(), cert.thumbprint()));
            }
        }
        Ok(Self { passwords, certificates, anonymous: cfg.anonymous, metrics })
    }

    fn refused(&self, why: &str) -> opcua::types::Error {
        self.metrics.opcua_session("refused");
        tracing::warn!("OPC UA session refused: {why}");
        opcua::types::Error::new(StatusCode::BadIdentityTokenRejected, why.to_string())
    }

    fn accepted(&self, who: &str) -> UserToken {
        self.metrics.opcua_session("accepted");
        tracing::info!("OPC UA session for {who}");
        UserToken(who.to_string())
    }
}

#[async_trait]
impl AuthManager for Users {
    async fn authenticate_anonymous_token(&self, _endpoint: &ServerEndpoint) -> Result<(), opcua::types::Error> {
        if self.anonymous {
            self.metrics.opcua_session("accepted");
            return Ok(());
        }
        Err(self.refused("anonymous sessions are off (opcua.anonymous)"))
    }

    async fn authenticate_username_identity_token(
        &self,
        _endpoint: &ServerEndpoint,
        username: &str,
        password: &Password,
    ) -> Result<UserToken, opcua::types::Error> {
        // Every user's secret is compared, so the time taken does not tell which names exist.
        let hit = self.passwords.iter().fold(false, |hit, (name, secret)| {
            let ok = secret.matches(password.get());
            hit | (ok && name == username)
        });
        if hit {
            Ok(self.accepted(username))
        } else {
            Err(self
                .refused(&format!("wrong user name or password for {:?}", crate::util::text::escaped(username, 64))))
        }
    }

    async fn authenticate_x509_identity_token(
        &self,
        _endpoint: &ServerEndpoint,
        signing_thumbprint: &Thumbprint,
    ) -> Result<UserToken, opcua::types::Error> {
        match self.certificates.iter().find(|(_, t)| t == signing_thumbprint) {
            Some((name, _)) => Ok(self.accepted(name)),
            None => Err(self.refused("the user certificate is not one of opcua.user's")),
        }
    }

    fn user_token_policies(&self, endpoint: &ServerEndpoint) -> Vec<UserTokenPolicy> {
        let mut policies = Vec::new();
        let policy = |id: UAString, token_type, uri: &str| UserTokenPolicy {
            policy_id: id,
            token_type,
            issued_token_type: UAString::null(),
            issuer_endpoint_url: UAString::null(),
            security_policy_uri: if uri.is_empty() { UAString::null() } else { UAString::from(uri) },
        };
        if self.anonymous {
            policies.push(policy(UAString::from("anonymous"), UserTokenType::Anonymous, ""));
        }
        // On an endpoint without security the password is still encrypted, with the server's
        // certificate (Basic256Sha256), never sent in the clear.
        let token_security = if endpoint.security_policy() == SecurityPolicy::None {
            SecurityPolicy::Basic256Sha256.to_uri()
        } else {
            ""
        };
        if !self.passwords.is_empty() {
            policies.push(policy(user_pass_security_policy_id(endpoint), UserTokenType::UserName, token_security));
        }
        if !self.certificates.is_empty() {
            // The token's signature is checked with this policy, so it must name one.
            let sign = if token_security.is_empty() { endpoint.security_policy().to_uri() } else { token_security };
            policies.push(policy(UAString::from("x509"), UserTokenType::Certificate, sign));
        }
        policies
    }
}

/// One camera's nodes and what the server knows of it.
struct CameraNodes {
    object: NodeId,
    /// Results shown since the server started.
    results: AtomicU64,
    /// Part ids made for triggers that named none (`UA-<n>`).
    made_ids: AtomicU64,
    /// The camera whose results are being shown (a reload keeps it, so nothing is shown twice).
    source: Mutex<std::sync::Weak<CameraShared>>,
}

/// The running server: its handle, the node manager holding anomalyd's nodes, and the cameras.
pub struct OpcUaServer {
    handle: ServerHandle,
    nodes: Arc<SimpleNodeManager>,
    ns: u16,
    cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
    shown: Mutex<BTreeMap<String, Arc<CameraNodes>>>,
    metrics: Arc<Metrics>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    addr: SocketAddr,
}

fn var(ns: u16, camera: &str, path: &str) -> NodeId {
    NodeId::new(ns, format!("{camera}.{path}"))
}

impl OpcUaServer {
    /// Binds `cfg.listen` and starts serving; the camera nodes appear as the cameras are
    /// [`attach`](OpcUaServer::attach)ed. Certificates live in `pki_dir` (the server's own is made at
    /// the first start).
    pub async fn start(
        cfg: &OpcUaConfig,
        node: &str,
        pki_dir: &Path,
        cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, OpcUaError> {
        let bind_err = |cause| OpcUaError::Bind { addr: cfg.listen.clone(), cause };
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let host = cfg.host.clone().unwrap_or_else(|| addr.ip().to_string());
        let users = Users::load(cfg, metrics.clone())?;
        let mut builder = ServerBuilder::new()
            .application_name("anomalyd")
            .application_uri(format!("urn:anomalyd:{node}"))
            .product_uri("urn:anomalyd")
            .discovery_urls(vec![format!("opc.tcp://{host}:{}/", addr.port())])
            .host(host)
            .port(addr.port())
            .pki_dir(pki_dir)
            .certificate_path("own/cert.der")
            .private_key_path("private/private.pem")
            .create_sample_keypair(true)
            .trust_client_certs(false)
            .with_authenticator(Arc::new(users))
            .with_node_manager(simple_node_manager(
                NamespaceMetadata { namespace_uri: NAMESPACE.to_owned(), ..Default::default() },
                "anomalyd",
            ));
        // A PLC waits for its result: subscriptions are checked every 10 ms (the library's default,
        // 100 ms, would add up to a tenth of a second to every ResultReady), and may publish that often.
        builder = builder.subscription_poll_interval_ms(POLL_MS);
        builder.limits_mut().subscriptions.min_publishing_interval_ms = POLL_MS as f64;
        builder.limits_mut().subscriptions.min_sampling_interval_ms = POLL_MS as f64;
        // The library checks that each endpoint's user token ids exist; the secrets themselves stay
        // with [`Users`], so these carry no password.
        let mut ids = Vec::new();
        for (i, u) in cfg.user.iter().enumerate() {
            let id = format!("user{i}");
            let token = ServerUserToken {
                user: u.name.clone(),
                pass: u.password_file.as_ref().map(|_| "<password_file>".to_string()),
                x509: u.certificate.as_ref().map(|p| p.display().to_string()),
                thumbprint: None,
                read_diagnostics: false,
            };
            builder = builder.add_user_token(id.clone(), token);
            ids.push(id);
        }
        if cfg.anonymous {
            ids.push(ANONYMOUS_USER_TOKEN_ID.to_string());
        }
        for policy in &cfg.security {
            let (p, mode) = match policy.as_str() {
                "none" => (SecurityPolicy::None, MessageSecurityMode::None),
                "aes128sha256rsaoaep" => (SecurityPolicy::Aes128Sha256RsaOaep, MessageSecurityMode::SignAndEncrypt),
                "aes256sha256rsapss" => (SecurityPolicy::Aes256Sha256RsaPss, MessageSecurityMode::SignAndEncrypt),
                _ => (SecurityPolicy::Basic256Sha256, MessageSecurityMode::SignAndEncrypt),
            };
            let mut endpoint = ServerEndpoint::new("/", p, mode, &ids);
            if p == SecurityPolicy::None {
                endpoint.password_security_policy = Some(SecurityPolicy::Basic256Sha256.to_str().to_string());
            }
            builder = builder.add_endpoint(policy.clone(), endpoint);
        }
        let (server, handle) = builder.build().map_err(OpcUaError::Server)?;
        let nodes = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .ok_or_else(|| OpcUaError::Server("no node manager for anomalyd's namespace".into()))?;
        let ns = handle.get_namespace_index(NAMESPACE).ok_or_else(|| OpcUaError::Server("no namespace".into()))?;
        let me = Arc::new(Self {
            handle,
            nodes,
            ns,
            cameras,
            shown: Mutex::new(BTreeMap::new()),
            metrics,
            task: Mutex::new(None),
            addr,
        });
        me.add_types();
        let task = tokio::spawn(async move {
            if let Err(e) = server.run_with(listener).await {
                tracing::error!("OPC UA server stopped: {e}");
            }
        });
        *sync::lock(&me.task) = Some(task);
        Ok(me)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: sessions are told, then closed.
    pub fn stop(&self) {
        self.handle.cancel();
        if let Some(t) = sync::lock(&self.task).take() {
            t.abort();
        }
    }

    /// The `anomalyd` folder and the `ResultReadyEventType`, with its fields as properties, in the
    /// address space and the type tree (which event filters are checked against).
    fn add_types(&self) {
        let ns = self.ns;
        let event_type = ResultReady::event_type_id_from_index(ns);
        let mut space = self.nodes.address_space().write();
        space.add_folder(&NodeId::new(ns, "anomalyd"), "anomalyd", "anomalyd", &NodeId::objects_folder_id());
        ObjectTypeBuilder::new(&event_type, "ResultReadyEventType", "ResultReadyEventType")
            .is_abstract(false)
            .subtype_of(ObjectTypeId::BaseEventType)
            .insert(&mut *space);
        let mut tree = self.handle.type_tree().write();
        tree.add_type_node(&event_type, &ObjectTypeId::BaseEventType.into(), NodeClass::ObjectType);
        for (name, dt) in EVENT_FIELDS {
            let id = NodeId::new(ns, format!("ResultReadyEventType.{name}"));
            let browse = QualifiedName::new(ns, name);
            VariableBuilder::new(&id, browse.clone(), name)
                .data_type(dt)
                .property_of(event_type.clone())
                .has_type_definition(VariableTypeId::PropertyType)
                .has_modelling_rule(ObjectId::ModellingRule_Mandatory)
                .insert(&mut *space);
            tree.add_type_property(&id, &event_type, &[&browse], NodeClass::Variable);
        }
    }

    /// Shows a camera (again, after a reload): its nodes, made the first time, and from now on its
    /// results. Call once its [`CameraShared`] is in the shared map.
    pub fn attach(self: &Arc<Self>, cam: &Arc<CameraShared>) {
        let nodes = {
            let mut shown = sync::lock(&self.shown);
            if let Some(n) = shown.get(&cam.name) {
                n.clone()
            } else {
                let n = Arc::new(self.add_camera(&cam.name));
                shown.insert(cam.name.clone(), n.clone());
                n
            }
        };
        self.show_recipes(cam);
        {
            let mut source = sync::lock(&nodes.source);
            if source.upgrade().is_some_and(|s| Arc::ptr_eq(&s, cam)) {
                return;
            }
            *source = Arc::downgrade(cam);
        }
        let mut results = cam.results();
        let (me, camera) = (self.clone(), cam.name.clone());
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match results.recv().await {
                    Ok(msg) => me.show_result(&camera, &nodes, &msg),
                    Err(RecvError::Lagged(n)) => me.metrics.opcua_results_missed(&camera, n),
                    Err(RecvError::Closed) => break,
                }
            }
        });
    }

    /// A camera's state (`streaming`, `reconnecting`, ...), as the MQTT state topic has it.
    pub fn set_state(&self, camera: &str, state: &str) {
        if sync::lock(&self.shown).contains_key(camera) {
            self.set(&[(var(self.ns, camera, "State"), Variant::from(state))], DateTime::now());
        }
    }

    fn set(&self, values: &[(NodeId, Variant)], at: DateTime) {
        let subs: &SubscriptionCache = self.handle.subscriptions();
        let items = values.iter().map(|(id, v)| {
            let mut dv = DataValue::new_at(v.clone(), at);
            dv.server_timestamp = Some(DateTime::now());
            (id, None, dv)
        });
        if let Err(e) = self.nodes.set_values(subs, items) {
            tracing::warn!("OPC UA: cannot set values: {e}");
        }
    }

    /// The recipes configured (the one in use is read when asked).
    fn show_recipes(&self, cam: &CameraShared) {
        let all: Vec<UAString> = cam.models().iter().filter_map(|m| m.recipe.clone()).map(UAString::from).collect();
        self.set(&[(var(self.ns, &cam.name, "Recipes"), Variant::from(all))], DateTime::now());
    }

    /// The camera's object with its variables and methods under the `anomalyd` folder.
    fn add_camera(self: &Arc<Self>, camera: &str) -> CameraNodes {
        let ns = self.ns;
        let object = NodeId::new(ns, camera.to_string());
        let result = var(ns, camera, "Result");
        {
            let mut space = self.nodes.address_space().write();
            ObjectBuilder::new(&object, camera, camera)
                .event_notifier(EventNotifier::SUBSCRIBE_TO_EVENTS)
                .organized_by(NodeId::new(ns, "anomalyd"))
                .has_type_definition(ObjectTypeId::BaseObjectType)
                .insert(&mut *space);
            let variable = |space: &mut AddressSpace, parent: &NodeId, name: &str, dt: DataTypeId, v: Variant| {
                let id = var(ns, camera, &format!("{}{name}", if parent == &object { "" } else { "Result." }));
                VariableBuilder::new(&id, QualifiedName::new(ns, name), name)
                    .data_type(dt)
                    .value(v)
                    .component_of(parent.clone())
                    .has_type_definition(VariableTypeId::BaseDataVariableType)
                    .insert(space);
            };
            variable(&mut space, &object, "State", DataTypeId::String, Variant::from("loading"));
            variable(&mut space, &object, "ActiveRecipe", DataTypeId::String, Variant::from(""));
            VariableBuilder::new(&var(ns, camera, "Recipes"), QualifiedName::new(ns, "Recipes"), "Recipes")
                .data_type(DataTypeId::String)
                .value_rank(1)
                .value(Variant::from(Vec::<UAString>::new()))
                .component_of(object.clone())
                .has_type_definition(VariableTypeId::BaseDataVariableType)
                .insert(&mut *space);
            ObjectBuilder::new(&result, QualifiedName::new(ns, "Result"), "Result")
                .component_of(object.clone())
                .has_type_definition(ObjectTypeId::BaseObjectType)
                .insert(&mut *space);
            for (name, dt, v) in [
                ("ResultSeq", DataTypeId::UInt32, Variant::from(0u32)),
                ("ResultId", DataTypeId::String, Variant::from("")),
                ("PartId", DataTypeId::String, Variant::from("")),
                ("ProductId", DataTypeId::String, Variant::from("")),
                ("Verdict", DataTypeId::String, Variant::from("")),
                ("Score", DataTypeId::Double, Variant::from(f64::NAN)),
                ("Threshold", DataTypeId::Double, Variant::from(f64::NAN)),
                ("Regions", DataTypeId::UInt32, Variant::from(0u32)),
                ("Answer", DataTypeId::String, Variant::from("")),
                ("EnrolmentId", DataTypeId::String, Variant::from("")),
                ("CaptureTime", DataTypeId::DateTime, Variant::from(DateTime::null())),
            ] {
                variable(&mut space, &result, name, dt, v);
            }
            let string_arg = |name: &str, what: &str| Argument {
                name: name.into(),
                data_type: DataTypeId::String.into(),
                value_rank: -1,
                array_dimensions: None,
                description: LocalizedText::new("en", what),
            };
            let method = |space: &mut AddressSpace, name: &str, inputs: &[Argument], outputs: &[Argument]| {
                MethodBuilder::new(&var(ns, camera, name), QualifiedName::new(ns, name), name)
                    .component_of(object.clone())
                    .executable(true)
                    .user_executable(true)
                    .input_args(space, &var(ns, camera, &format!("{name}.InputArguments")), inputs)
                    .output_args(space, &var(ns, camera, &format!("{name}.OutputArguments")), outputs)
                    .insert(space);
            };
            method(
                &mut space,
                "Trigger",
                &[
                    string_arg("PartId", "the part's id; empty: one is made (UA-<n>)"),
                    string_arg("ProductId", "the recipe to judge it with; empty: the one in use"),
                ],
                &[string_arg("PartId", "the part's id, as its ResultReady event will carry it")],
            );
            method(
                &mut space,
                "SelectRecipe",
                &[string_arg("ProductId", "a recipe of this camera")],
                &[string_arg("ActiveRecipe", "the recipe in use from now on")],
            );
        }
        // The recipe in use is read when asked: any protocol may have switched it.
        let (cameras, name) = (self.cameras.clone(), camera.to_string());
        self.nodes.inner().add_read_callback(var(ns, camera, "ActiveRecipe"), move |_, _, _| {
            let recipe = sync::lock(&cameras).get(&name).and_then(|c| c.model().recipe.clone()).unwrap_or_default();
            Ok(DataValue::new_now(Variant::from(recipe)))
        });
        let (me, name) = (Arc::downgrade(self), camera.to_string());
        self.nodes.inner().add_method_callback(var(ns, camera, "Trigger"), move |args| {
            let me = me.upgrade().ok_or(StatusCode::BadShutdown)?;
            me.counted(&name, "Trigger", me.trigger(&name, args))
        });
        let (me, name) = (Arc::downgrade(self), camera.to_string());
        self.nodes.inner().add_method_callback(var(ns, camera, "SelectRecipe"), move |args| {
            let me = me.upgrade().ok_or(StatusCode::BadShutdown)?;
            me.counted(&name, "SelectRecipe", me.select_recipe(&name, args))
        });
        CameraNodes {
            object,
            results: AtomicU64::new(0),
            made_ids: AtomicU64::new(0),
            source: Mutex::new(std::sync::Weak::new()),
        }
    }

    fn counted(
        &self,
        camera: &str,
        method: &str,
        out: Result<Vec<Variant>, StatusCode>,
    ) -> Result<Vec<Variant>, StatusCode> {
        let label = match &out {
            Ok(_) => "good".to_string(),
            Err(s) => s.to_string(),
        };
        self.metrics.opcua_call(camera, method, &label);
        out
    }

    fn camera(&self, name: &str) -> Result<Arc<CameraShared>, StatusCode> {
        sync::lock(&self.cameras).get(name).cloned().ok_or(StatusCode::BadInvalidState)
    }

    /// `Trigger(PartId, ProductId)`: queues the part for the camera's next frame.
    fn trigger(&self, camera: &str, args: &[Variant]) -> Result<Vec<Variant>, StatusCode> {
        let [part, product] = strings::<2>(args)?;
        let cam = self.camera(camera)?;
        if cam.trigger_mode() != Trigger::Triggered {
            tracing::warn!(camera = %camera, "OPC UA Trigger refused: the camera is not trigger = \"triggered\"");
            return Err(StatusCode::BadInvalidState);
        }
        let part = if part.is_empty() {
            let n = sync::lock(&self.shown).get(camera).map_or(0, |n| n.made_ids.fetch_add(1, Ordering::Relaxed));
            format!("UA-{}", n + 1)
        } else {
            command::check_part_id(&part).map_err(|_| StatusCode::BadInvalidArgument)?;
            part
        };
        let product = if product.is_empty() {
            None
        } else {
            command::check_product(&product).map_err(|_| StatusCode::BadInvalidArgument)?;
            Some(product)
        };
        match cam.trigger(part.clone(), product) {
            // An unknown product's part has its ERROR verdict already, with the reason.
            Triggered::Queued | Triggered::UnknownProduct => Ok(vec![Variant::from(part)]),
            Triggered::Full => Err(StatusCode::BadTooManyOperations),
        }
    }

    /// `SelectRecipe(ProductId)`: the recipe frames are judged with from now on.
    fn select_recipe(&self, camera: &str, args: &[Variant]) -> Result<Vec<Variant>, StatusCode> {
        let [product] = strings::<1>(args)?;
        command::check_product(&product).map_err(|_| StatusCode::BadInvalidArgument)?;
        let cam = self.camera(camera)?;
        cam.switch_recipe(&product).map_err(|e| {
            tracing::warn!(camera = %camera, "OPC UA SelectRecipe refused: {e}");
            StatusCode::BadInvalidArgument
        })?;
        self.show_recipes(&cam);
        Ok(vec![Variant::from(product)])
    }

    /// A verdict: the `Result` variables, then the `ResultReady` event on the camera and the Server.
    fn show_result(&self, camera: &str, nodes: &CameraNodes, msg: &VerdictMessage) {
        let ns = self.ns;
        let seq = (nodes.results.fetch_add(1, Ordering::Relaxed) + 1) as u32;
        let at = unix_ms(msg.captured_unix_ms);
        let score = msg.score.map_or(f64::NAN, f64::from);
        let threshold = msg.threshold.map_or(f64::NAN, f64::from);
        let product = msg.product.clone().unwrap_or_default();
        let part = msg.part_id.clone().unwrap_or_default();
        let r = |n: &str| var(ns, camera, &format!("Result.{n}"));
        self.set(
            &[
                (r("ResultId"), Variant::from(msg.frame_id.clone())),
                (r("PartId"), Variant::from(part.clone())),
                (r("ProductId"), Variant::from(product.clone())),
                (r("Verdict"), Variant::from(msg.verdict.as_str())),
                (r("Score"), Variant::from(score)),
                (r("Threshold"), Variant::from(threshold)),
                (r("Regions"), Variant::from(msg.regions.len() as u32)),
                (r("Answer"), Variant::from(msg.answer.clone().or_else(|| msg.reason.clone()).unwrap_or_default())),
                (r("EnrolmentId"), Variant::from(msg.enrolment.as_ref().map(|e| e.id.clone()).unwrap_or_default())),
                (r("CaptureTime"), Variant::from(at)),
                // Last: a client that watches ResultSeq reads a complete result when it changes.
                (r("ResultSeq"), Variant::from(seq)),
            ],
            at,
        );
        let message =
            format!("{camera}: {} {}", msg.verdict.as_str(), if part.is_empty() { &msg.frame_id } else { &part });
        let mut event = ResultReady {
            base: BaseEventType::new(
                ResultReady::event_type_id_from_index(ns),
                opcua::crypto::random::byte_string(16),
                message,
                DateTime::now(),
            )
            .set_source_node(nodes.object.clone())
            .set_source_name(UAString::from(camera))
            .set_severity(if msg.verdict == crate::types::verdict::Outcome::Ok { 100 } else { 500 }),
            own_namespace_index: ns,
            result_seq: seq,
            result_id: msg.frame_id.clone(),
            part_id: part,
            product_id: product,
            verdict: msg.verdict.as_str().to_string(),
            score,
            threshold,
            regions: msg.regions.len() as u32,
        };
        event.base.receive_time = DateTime::now();
        let server: NodeId = ObjectId::Server.into();
        let subs = self.handle.subscriptions();
        subs.notify_events([(&event as &dyn opcua::nodes::Event, &nodes.object), (&event, &server)].into_iter());
    }
}

/// Unix milliseconds as an OPC UA DateTime (100 ns ticks since 1601-01-01).
fn unix_ms(ms: u64) -> DateTime {
    const UNIX_EPOCH_TICKS: i64 = 116_444_736_000_000_000;
    DateTime::from(UNIX_EPOCH_TICKS + (ms as i64).saturating_mul(10_000))
}

/// Exactly `N` string arguments: too few, too many or another type is the caller's error.
fn strings<const N: usize>(args: &[Variant]) -> Result<[String; N], StatusCode> {
    if args.len() < N {
        return Err(StatusCode::BadArgumentsMissing);
    }
    if args.len() > N {
        return Err(StatusCode::BadTooManyArguments);
    }
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for (o, a) in out.iter_mut().zip(args) {
        *o = match a {
            Variant::String(s) => s.as_ref().to_string(),
            Variant::Empty => String::new(),
            _ => return Err(StatusCode::BadTypeMismatch),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_arguments_are_checked_for_count_and_type() {
        let s = |v: &str| Variant::from(v);
        assert_eq!(strings::<2>(&[s("P-1"), s("")]).unwrap(), ["P-1".to_string(), String::new()]);
        assert_eq!(strings::<2>(&[s("P-1")]), Err(StatusCode::BadArgumentsMissing));
        assert_eq!(strings::<1>(&[s("a"), s("b")]), Err(StatusCode::BadTooManyArguments));
        assert_eq!(strings::<1>(&[Variant::from(7i32)]), Err(StatusCode::BadTypeMismatch));
        assert_eq!(strings::<1>(&[Variant::Empty]).unwrap(), [String::new()]);
    }
}
