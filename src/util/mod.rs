//! Helpers with no knowledge of inspection: image files and pixels ([`imageio`]), the seeded
//! random numbers every generated image comes from ([`rng`]), and the poison-tolerant lock ([`sync`]).

pub mod imageio;
pub mod rng;
pub mod sync;
pub mod url;
